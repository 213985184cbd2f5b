"""CLIP-Scope Explorer web application."""
