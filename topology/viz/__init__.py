"""Pictures of a topology and its plan: the interactive page, PNG/SVG figures and their shared colour scales."""
