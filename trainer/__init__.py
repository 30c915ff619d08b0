"""fipo: trainer package."""
