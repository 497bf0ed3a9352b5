"""TFDS builders (manual download) that write any jaxmed dataset to ArrayRecord files holding
the original encoded image bytes, and a source that reads them back through
`tfds.data_source` semantics (no TensorFlow needed for either).

    python -m jaxmed.data.tfds --dataset ham10000 --root /data/HAM10000 --data-dir /data/tfds
    jaxmed --config=... --config.data.name=tfds \
        --config.data.root=/data/tfds/jaxmed_dataset/ham10000/1.0.0
"""

from jaxmed.data.tfds.builder import JaxmedDataset, TfdsSource, prepare  # noqa: F401
