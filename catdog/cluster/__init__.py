"""Ray: starting or joining a cluster, and what a job may ask of it.

`session` (one way to start or join Ray, quiet and on 127.0.0.1 locally), `checks` (local paths on
a cluster of several nodes), `capacity` (GPUs present and what an autoscaler can add) and
`actor_pool` (the model actors' pool policy, shared by scoring and feature caching).

May import: `catdog.model`, `catdog.io`, `catdog.errors`, `catdog.process`.
"""
