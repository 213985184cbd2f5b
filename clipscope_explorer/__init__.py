"""CLIP-Scope Explorer: a feature explorer for vision sparse autoencoders."""
