#pragma once
// Parameters of a layer live in one contiguous buffer with named views into it, so that saving,
// averaging and all-reducing a layer is one memcpy / one loop / one collective (as in llm.c).
#include <algorithm>
#include <limits>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "detail/aligned.hpp"
#include "error.hpp"
#include "view.hpp"

namespace comigs {

/// One named tensor inside a parameter buffer. Tensors are stored row-major; a 1-D tensor of n
/// elements is viewed as a 1 x n matrix.
struct TensorSpec {
    std::string name;
    std::vector<Index> shape;
    Index offset = 0;  ///< in elements from the start of the buffer
    Index size = 0;    ///< number of elements

    Index rows() const { return shape.size() >= 2 ? shape[0] : 1; }
    Index cols() const { return shape.empty() ? 1 : shape.back(); }
};

/// The ordered list of tensors of a buffer. Tensors added consecutively are adjacent, so a group of
/// them (e.g. everything of one expert) is itself a contiguous range.
class ParamLayout {
public:
    /// Appends a tensor; shape has 1 or 2 dimensions. Returns its offset. Every tensor starts on a
    /// multiple of 16 elements (64 bytes for float), so a view of any tensor is SIMD-aligned. Sizes come
    /// from files and configurations: every product and sum is overflow-checked, and a refused tensor
    /// leaves the layout as it was.
    Index add(std::string name, std::vector<Index> shape) {
        require(!name.empty(), "tensor name: must not be empty");
        require(find(name) == nullptr, "tensor name '", name, "': already in the layout");
        require<ShapeError>(shape.size() == 1 || shape.size() == 2, "tensor '", name, "': rank ", shape.size(),
                            " not supported (1 or 2)");
        Index n = 1;
        for (Index s : shape) {
            require<ShapeError>(s >= 0, "tensor '", name, "': negative dimension ", s);
            if (__builtin_mul_overflow(n, s, &n))
                detail::raise<ShapeError>("tensor '", name, "': shape [", shape.front(), ", ", shape.back(),
                                          "] has more elements than an index can count");
        }
        constexpr Index max = std::numeric_limits<Index>::max();
        require<ShapeError>(total_ <= max - 15 && (total_ + 15) / 16 * 16 <= max - n, "tensor '", name, "': ", n,
                            " elements after ", total_, " overflow the buffer's index range");
        const Index offset = (total_ + 15) / 16 * 16;
        index_.emplace(name, specs_.size());
        specs_.push_back({std::move(name), std::move(shape), offset, n});
        total_ = offset + n;
        return offset;
    }

    /// The tensor called `name`, or nullptr (a lookup in a sorted index: layers look tensors up by name
    /// on every step, and a layout may hold thousands).
    const TensorSpec* find(std::string_view name) const {
        const auto it = index_.find(name);
        return it == index_.end() ? nullptr : &specs_[it->second];
    }
    const TensorSpec& at(std::string_view name) const {
        const TensorSpec* s = find(name);
        require(s != nullptr, "tensor '", name, "': not in the layout");
        return *s;
    }
    const std::vector<TensorSpec>& tensors() const { return specs_; }
    Index total() const { return total_; }  ///< elements including alignment padding

    bool operator==(const ParamLayout& o) const {
        if (specs_.size() != o.specs_.size() || total_ != o.total_) return false;
        for (std::size_t i = 0; i < specs_.size(); ++i)
            if (specs_[i].name != o.specs_[i].name || specs_[i].shape != o.specs_[i].shape) return false;
        return true;
    }

private:
    std::vector<TensorSpec> specs_;
    std::map<std::string, std::size_t, std::less<>> index_;  // name -> position in specs_
    Index total_ = 0;
};

/// A contiguous, 64-byte aligned buffer of tensors described by a shared layout. Gradient buffers use
/// the same layout as their parameters: `ParamBuffer<T> grad(params.layout_ptr())`.
template <class T>
class ParamBuffer {
public:
    ParamBuffer() : layout_(std::make_shared<ParamLayout>()) {}
    explicit ParamBuffer(std::shared_ptr<const ParamLayout> layout)
        : layout_(std::move(layout)), data_(static_cast<std::size_t>(layout_->total()), T(0)) {}
    explicit ParamBuffer(ParamLayout layout) : ParamBuffer(std::make_shared<const ParamLayout>(std::move(layout))) {}

    const ParamLayout& layout() const { return *layout_; }
    const std::shared_ptr<const ParamLayout>& layout_ptr() const { return layout_; }

    MatrixView<T> view(std::string_view name) { return make_view<T>(data_.data(), layout_->at(name)); }
    ConstMatrixView<T> view(std::string_view name) const {
        return make_view<const T>(data_.data(), layout_->at(name));
    }
    std::span<T> span(std::string_view name) {
        const auto& s = layout_->at(name);
        return {data_.data() + s.offset, static_cast<std::size_t>(s.size)};
    }
    std::span<const T> span(std::string_view name) const {
        const auto& s = layout_->at(name);
        return {data_.data() + s.offset, static_cast<std::size_t>(s.size)};
    }
    bool contains(std::string_view name) const { return layout_->find(name) != nullptr; }

    T* data() { return data_.data(); }
    const T* data() const { return data_.data(); }
    Index size() const { return static_cast<Index>(data_.size()); }
    std::span<T> all() { return {data_.data(), data_.size()}; }
    std::span<const T> all() const { return {data_.data(), data_.size()}; }

    void zero() { std::fill(data_.begin(), data_.end(), T(0)); }

private:
    template <class U>
    static MatrixView<U> make_view(U* base, const TensorSpec& s) {
        return MatrixView<U>(base + s.offset, s.rows(), s.cols());
    }

    std::shared_ptr<const ParamLayout> layout_;
    detail::aligned_vector<T> data_;
};

}  // namespace comigs
