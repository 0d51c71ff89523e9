"""Graph surgery: apply a channel selection to the model's initializers and attributes."""
