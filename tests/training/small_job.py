"""The small synthetic job the training tests run (seconds per run on 2 cores)."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = [
    "data.synthetic.cardinalities=[2000,500,100,50,20,10]",
    "data.synthetic.num_noise_fields=2",
    "data.synthetic.multi_hot_fields=[1]",
    "data.synthetic.num_train_samples=20000",
    "data.synthetic.num_val_samples=2048",
    "trainer.batch_size=256",
    "trainer.eval_batches=4",
    "trainer.progress=false",
    "tables.embedding_dim=16",
    "model.interaction_dim=16",
]
