from ocistore.cli import run

run()
