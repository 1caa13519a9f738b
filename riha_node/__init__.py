"""riha-node: drafts chest X-ray reports beside PACS."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("riha-node")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
