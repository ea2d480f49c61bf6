"""Finding attention in FX graphs (the graph matcher and rewrite live here)."""
