"""`embedstore serve`: the FastAPI application over one store (app.py), the shapes it answers with
(responses.py), what may leave it (public.py) and its thumbnails (thumbnails.py)."""
