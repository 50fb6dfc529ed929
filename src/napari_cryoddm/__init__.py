"""napari-cryoddm: the CryoDDM cryo-EM denoising workflow in napari and on the command line."""

__version__ = "0.1.0"
