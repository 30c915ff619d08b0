"""fipo: fipo_env package."""
