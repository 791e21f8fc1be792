// aaren._C: importing it loads the operator library (which registers torch.ops.aaren.*)
// and reports how that library was built.
#include <pybind11/pybind11.h>

#include "aaren/aaren.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "Loads the aaren operator library and reports how it was built.";
  m.def("build_info_json", &aaren::build_info_json,
        "How the aaren operator library was built, as a JSON object.");
}
