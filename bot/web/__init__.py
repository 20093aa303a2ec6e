"""The web gallery: server-rendered pages of the images servers chose to show (read-only)."""
