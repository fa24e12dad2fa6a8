""" Helpers shared by the test modules. """
import torch
from timm.layers import get_notrace_functions, get_notrace_modules


def random_bn_entries(sd: dict, prefix: str, c: int, g: torch.Generator):
    """BatchNorm entries with non-trivial values, as a trained checkpoint has them."""
    sd[prefix + 'weight'] = torch.rand(c, generator=g) + 0.5
    sd[prefix + 'bias'] = torch.randn(c, generator=g) * 0.2
    sd[prefix + 'running_mean'] = torch.randn(c, generator=g) * 0.2
    sd[prefix + 'running_var'] = torch.rand(c, generator=g) + 0.5
    sd[prefix + 'num_batches_tracked'] = torch.tensor(100)


def fx_model(model, train: bool):
    """The model traced as timm's fx tests do (torchvision's extractor with timm's notrace leaves)."""
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
    tracer_kwargs = dict(leaf_modules=list(get_notrace_modules()), autowrap_functions=list(get_notrace_functions()))
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    model.train(train)
    return create_feature_extractor(
        model, return_nodes=[(train_nodes if train else eval_nodes)[-1]], tracer_kwargs=tracer_kwargs)
