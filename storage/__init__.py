"""Records and hand-offs: models, sessions, queries, the Recipe schema, blobs.

Importing this package never imports torch or diffusers.
"""
