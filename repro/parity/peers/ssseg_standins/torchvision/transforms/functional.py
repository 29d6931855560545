"""resize and to_pil_image: imported by sssegmentation's SAM code only; they raise when called."""


def _unavailable(name: str):
    def function(*args, **kwargs):
        raise NotImplementedError(
            f"torchvision.transforms.functional.{name} is a stand-in (ccrepro parity peer venv without "
            "torchvision); sssegmentation's CCNet never calls it"
        )

    function.__name__ = name
    return function


resize = _unavailable("resize")
to_pil_image = _unavailable("to_pil_image")
