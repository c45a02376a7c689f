"""``noadapt``: no test-time adaptation; the meta-parameters predict the query set as they are."""

from advframe.hookspecs import hookimpl


@hookimpl
def adapt_task(model):
    return model
