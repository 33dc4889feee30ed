"""A stock ``EmbeddingBagCollection`` holding a compressed collection's dequantised tables (the reference the
drop-in checks compare against)."""

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection


def stock_from(ebc) -> EmbeddingBagCollection:
    stock = EmbeddingBagCollection(
        tables=[EmbeddingBagConfig(name=c.name, num_embeddings=c.num_embeddings, embedding_dim=c.embedding_dim,
                                   feature_names=list(c.feature_names), pooling=c.pooling)
                for c in ebc.embedding_bag_configs()],
        is_weighted=ebc.is_weighted(),
    )
    with torch.no_grad():
        for name, table in ebc.embedding_bags.items():
            stock.embedding_bags[name].weight.copy_(table.full_weight())
    return stock
