def build_info():
    raise NotImplementedError
