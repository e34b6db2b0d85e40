"""The C part of pgcloak: the audit chain's per-event loop (pgcloak/audit/_chain_core.c).

It needs a C compiler, Python's headers and OpenSSL's (Debian: libssl-dev). Optional:
where it cannot be compiled, pgcloak installs and runs with the same loop in Python
(pgcloak/audit/chain.py), which writes the same bytes, only slower.
Everything else is in pyproject.toml.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "pgcloak.audit._chain_core",
            ["proxy/pgcloak/audit/_chain_core.c"],
            optional=True,
            libraries=["crypto"],  # OpenSSL's SHA-256, as hashlib's
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers", "-Wno-unused-parameter"],
        )
    ]
)
