"""What a stage will need and cost before it runs: memory per GPU, ring and Ulysses sizing, the dry run."""
