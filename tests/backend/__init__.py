"""Backend tests (asyncio side)."""
