"""The token-level environments (single and native vector)."""
