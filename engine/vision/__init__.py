"""Images for vision-language models, before the model sees them: preprocessing as tensor ops on the engine's
device (preprocess.py: resize / crop / pad / anyres tiles / normalize, reproducing transformers' image processors),
content hashes taken before any work, and the bounded worker pool that builds image requests off the asyncio event
loop (workers.py). Loading under the media policy is engine/media.py; prompts -> RequestInput is
engine/vision_input.py; the encoder cache is engine/encoder_cache.py."""
