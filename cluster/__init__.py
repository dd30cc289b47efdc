"""The cluster: YAML config, router, Ray actors and placement, the front end that drives them.

Only this package creates Ray actors and placement groups.
"""
