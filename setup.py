"""The C parts of pgcloak, the audit trail's per-statement work: the chain's per-event
loop (pgcloak/audit/_chain_core.c) and a session's usual reply
(pgcloak/session/_reply_core.c).

They need a C compiler, Python's headers and OpenSSL's (Debian: libssl-dev). Optional:
where they cannot be compiled, pgcloak installs and runs the same code in Python
(chain.py, auditing.py), which writes the same bytes, only slower.
Everything else is in pyproject.toml.
"""

from setuptools import Extension, setup

FLAGS = ["-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers", "-Wno-unused-parameter"]

setup(
    ext_modules=[
        Extension(
            "pgcloak.audit._chain_core",
            ["proxy/pgcloak/audit/_chain_core.c"],
            optional=True,
            libraries=["crypto"],  # OpenSSL's SHA-256, as hashlib's
            extra_compile_args=FLAGS,
        ),
        Extension(
            "pgcloak.session._reply_core",
            ["proxy/pgcloak/session/_reply_core.c"],
            optional=True,
            extra_compile_args=FLAGS,
        ),
    ]
)
