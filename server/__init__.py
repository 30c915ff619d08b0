"""fipo: server package."""
