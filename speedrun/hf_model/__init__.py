"""Transformers code for the exported model (copied verbatim into models/hf/ by speedrun.export).

The two modules are self-contained (no `speedrun` import) so that a Hub user loads them with
trust_remote_code=True and nothing else installed.
"""
