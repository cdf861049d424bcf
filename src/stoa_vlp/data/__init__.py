"""Data pipeline: decoding, transforms, annotation readers, datasets, detections, tags, synthetic world.

Modules are imported on use (`from stoa_vlp.data.decode import decode_clip`); importing this
package loads nothing heavy.
"""
