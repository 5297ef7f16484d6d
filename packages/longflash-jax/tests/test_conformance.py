"""The shared conformance suite (DESIGN §4), run on the pallas backend."""

import longflash.testing

TestPallasConformance = longflash.testing.conformance_suite("pallas", framework="jax")
