"""The demo: a sample world in the real input formats (with deliberately broken inputs), and
`uvd demo`, which runs every shipped recipe on it. Sample data for the demo and the tests, not core.

    uvd demo --out demo_out [--small] [--no-train]      # (make demo)
"""
