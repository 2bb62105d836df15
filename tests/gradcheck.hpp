#pragma once
// Central finite differences in double for tests: compares an analytic gradient with
// (f(p + eps) - f(p - eps)) / (2 eps) element by element, PyTorch gradcheck tolerances.
#include <doctest/doctest.h>

#include <cmath>
#include <functional>
#include <span>
#include <string>

namespace comigs::test {

struct GradcheckResult {
    double max_abs_err = 0.0;
    double max_rel_err = 0.0;
    long checked = 0;
    long failed = 0;
    double max_abs_grad = 0.0;
};

/// For every element i of `param` (or every `stride`-th), perturbs it by +-eps, evaluates `loss`,
/// and checks |fd - analytic[i]| <= atol + rtol |fd|.
inline GradcheckResult gradcheck(std::span<double> param, std::span<const double> analytic,
                                 const std::function<double()>& loss, const std::string& what, double eps = 1e-6,
                                 double atol = 1e-5, double rtol = 1e-3, std::size_t stride = 1) {
    REQUIRE(param.size() == analytic.size());
    GradcheckResult res;
    for (std::size_t i = 0; i < param.size(); i += stride) {
        const double old = param[i];
        param[i] = old + eps;
        const double lp = loss();
        param[i] = old - eps;
        const double lm = loss();
        param[i] = old;
        const double fd = (lp - lm) / (2 * eps);
        const double err = std::abs(fd - analytic[i]);
        res.max_abs_err = std::max(res.max_abs_err, err);
        res.max_abs_grad = std::max(res.max_abs_grad, std::abs(fd));
        if (std::abs(fd) > 1e-8) res.max_rel_err = std::max(res.max_rel_err, err / std::abs(fd));
        ++res.checked;
        if (err > atol + rtol * std::abs(fd)) {
            if (res.failed < 5)
                MESSAGE(what << "[" << i << "]: finite difference " << fd << " vs analytic " << analytic[i]);
            ++res.failed;
        }
    }
    INFO(what << ": checked " << res.checked << ", max abs err " << res.max_abs_err);
    CHECK(res.failed == 0);
    return res;
}

}  // namespace comigs::test
