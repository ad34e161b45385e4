"""Data influence model: text -> predicted oracle score, behind one interface (``InfluenceModel``) with
implementations registered by name (``INFLUENCE_MODELS``: 'finetune', 'ridge'), run by ``InfluenceRunner``."""
