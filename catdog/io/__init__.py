"""Input and storage: where files are and what is in them.

Local paths and object-store URIs (`storage`), the one spelling of an input path (`paths`),
listing a folder, prefix or manifest as a stream (`inputs`, `folder_walk`, `bucket_listing`,
`manifests`), reading files under limits of kind, size and time (`file_reads`), decoding them to
model-ready pixels (`imaging`), labelled class folders (`labelled`) and generated sample images
(`sample_data`).

May import: `catdog.errors` and modules of this wing. No Ray, no TensorFlow.
"""
