"""The federated run: the Flower ServerApp, its results recorder, the simulation engine, round
checkpoints, faults, diagnostics and the plain-PyTorch reference loop.
"""
