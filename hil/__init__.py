"""Hardware-in-the-loop rigs: simulators, impairment, benchmarks, the demo."""
