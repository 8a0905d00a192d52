"""Layer 7, workflow recipes: plan -> compress -> fine-tune -> measure, as the demo and users run it."""
