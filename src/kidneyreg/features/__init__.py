"""The feature network (paper, Methods "Feature Network"): kidney probability maps of CT and U/S.

Modules: ``lbc`` (local binary convolution), ``ulbnet`` (the network), ``config`` (per-profile
sizes), ``data`` and ``augment`` (training data), ``train``, ``infer`` (whole volumes, U/S
sequences, single images), ``metrics`` and ``benchmark`` (Table 1, Appendix E). Heavy submodules
are not imported here, so ``import kidneyreg.features`` stays cheap.
"""
