"""The wire protocol: one module per socket family, all msgspec Structs.

See envelope.py for the frame layout and the schema-evolution rules.
"""
