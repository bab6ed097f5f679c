"""What a backend may know: the semantics, resolved to plain values.

``geometry`` (every window formula and the frozen ``ConvProblem``), ``formats`` (feature-channel
formats, storage types, conversions), ``activations`` (``MPSCNNNeuronType`` and the formula table)
and ``weights`` (rounding rules, binary parameters). Modules here import only each other and the
leaves (``errors``, ``types``, ``config``, ``_version``); no class here has behaviour a user calls.
"""
