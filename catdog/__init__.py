"""catdog: distributed batch image classification on Ray and TensorFlow/Keras.

Heavy modules (TensorFlow, Ray) are imported by the submodules that need them, not here.
"""

__version__ = "0.1.0"
