"""`inv launch 4`, `inv inject pkg-examples/hello` ... from the repository root.

Every vtool verb is here (the same collection `vtool` runs); developer tasks live in the
`dev` sub-collection: `inv dev.test`, `inv dev.lint`.
"""

from invoke import Collection, task

from vtool.tasks import collection

ns = collection()


@task(help={"args": "extra pytest arguments"})
def test(c, args=""):
    """Run the test suite."""
    c.run(f"python -m pytest {args}", pty=False)


@task
def lint(c):
    """ruff check + mypy."""
    c.run("ruff check vtool tests")
    c.run("mypy vtool")


ns.add_collection(Collection("dev", test, lint))
