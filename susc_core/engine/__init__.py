"""The SGLD engine: the kernel, named random streams, stacks of chains, one work unit."""
