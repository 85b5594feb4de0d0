"""Task variants for the VLM connector check (suite ``vlm-connector``): the same Fashion-MNIST QA task with the
shared connector trained at the run's learning rate (the recipe that collapsed) and frozen after alignment.
The built-in ``fashion-mnist`` is the fixed recipe (connector at ``tasks.vlm.qa.CONNECTOR_LR``)."""

from tasks.registry import register_task
from tasks.vlm.qa import FashionMNISTQA


@register_task("fashion-mnist-connector-runlr")
class ConnectorAtRunLR(FashionMNISTQA):
    """The old recipe: every method trains the connector at its own (adapter) learning rate."""

    def __init__(self, **kw):
        super().__init__(**{"connector_lr": None, **kw})


@register_task("fashion-mnist-connector-frozen")
class ConnectorFrozen(FashionMNISTQA):
    """The connector stays as aligned (learning rate 0); only the method's adapters train."""

    def __init__(self, **kw):
        super().__init__(**{"connector_lr": 0.0, **kw})
