"""cai serve: a job API over cai.pipeline, with API keys, limits and a review page.

Start it with `cai serve` (cai/cli/serve.py) or `uvicorn --factory serve.app:create_app`.
"""

from serve.app import Limits, Settings, create_app

__all__ = ["Limits", "Settings", "create_app"]
