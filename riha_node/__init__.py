"""riha-node: drafts chest X-ray reports beside PACS."""
