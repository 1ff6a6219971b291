"""Offline dataset preparation: the converters behind ``datasets/prepare_<name>.py`` and the synthetic
benchmark's generator.

Each ``datasets/prepare_<name>.py`` script runs ``main`` of the module ``<name>`` here
(:mod:`.cityscapes`, :mod:`.gta5`, :mod:`.mapillary`, :mod:`.synthia`, :mod:`.synthetic`);
:mod:`.conversion` is what they share. They write the files that :mod:`gbw_panoptic.data.datasets`
registers, at the locations of :mod:`gbw_panoptic.data.datasets.layout`. Training never imports this
package.
"""
