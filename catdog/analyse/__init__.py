"""Reading predictions back: classification `metrics`, `plots`, `report` (a summary of any
predictions folder) and `evaluation` (scoring a labelled folder, then measuring it).

May import: `catdog.score`, `catdog.cluster`, `catdog.model`, `catdog.io`, `catdog.errors`.
"""
