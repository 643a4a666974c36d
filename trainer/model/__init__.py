"""The stage's model: HF Llama built or loaded (``llama``), its RoPE theta schedule (``rope``) and its sharded loss (``loss``)."""
