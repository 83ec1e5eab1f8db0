"""HTTP serving: FastAPI app factory, schemas, in-memory store view and the explanation page."""
