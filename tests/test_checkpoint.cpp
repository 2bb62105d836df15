#include <comigs/io/checkpoint.hpp>
#include <doctest/doctest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "tiny_host.hpp"

using namespace comigs;
using comigs_test::RegressionBatch;
using comigs_test::TinyHost;
using comigs_test::TinyHostConfig;
using comigs_test::UserData;

namespace {

struct TempDir {
    std::filesystem::path path;
    TempDir() {
        static int counter = 0;
        path = std::filesystem::temp_directory_path() /
               ("comigs-checkpoint-test-" + std::to_string(::getpid()) + "-" + std::to_string(counter++));
        std::filesystem::create_directories(path);
    }
    ~TempDir() {
        std::error_code ec;
        std::filesystem::remove_all(path, ec);
    }
    std::vector<std::string> entries() const {
        std::vector<std::string> out;
        for (const auto& e : std::filesystem::directory_iterator(path)) out.push_back(e.path().filename().string());
        return out;
    }
};

template <class T>
struct Setup {
    TinyHostConfig cfg;
    std::shared_ptr<const FrozenMlp<T>> base;
    UserData<T> data;
    TrainerConfig tcfg;
    explicit Setup(TinyHostConfig c = {}) : cfg(c), base(comigs_test::make_base<T>(c, 7)) {
        data = UserData<T>::make(c.d, 0, 11, 64, 32, 32);
        tcfg.router_every = 3;
        tcfg.router_iters = 2;
        tcfg.total_expert_steps = 14;
        tcfg.expert_lr = 1e-2;
    }
    std::unique_ptr<TinyHost<T>> host(std::uint64_t seed = 5) const {
        Rng rng(seed);
        return std::make_unique<TinyHost<T>>(cfg, base, rng);
    }
    using Tr = Trainer<TinyHost<T>, RegressionBatch<T>>;
    std::unique_ptr<Tr> trainer(TinyHost<T>& h, std::uint64_t seed = 21) const {
        return std::make_unique<Tr>(
            h, tcfg, [this](Rng& r) { return data.train_batch(8, r); }, [this](Rng& r) { return data.val_batch(8, r); },
            seed);
    }
};

template <class T>
bool bitwise_same(const std::vector<NamedTensor<T>>& a, const std::vector<NamedTensor<T>>& b) {
    if (a.size() != b.size()) return false;
    for (std::size_t i = 0; i < a.size(); ++i)
        if (a[i].name != b[i].name || a[i].shape != b[i].shape || a[i].data.size() != b[i].data.size() ||
            std::memcmp(a[i].data.data(), b[i].data.data(), a[i].data.size() * sizeof(T)) != 0)
            return false;
    return true;
}

}  // namespace

TEST_CASE_TEMPLATE("checkpoint: resuming from a saved file equals an uninterrupted run, bitwise", T, float, double) {
    Setup<T> s;
    TempDir dir;
    const auto path = dir.path / "user0.safetensors";

    auto full = s.host();
    auto t_full = s.trainer(*full);
    t_full->train_steps(14);

    auto first = s.host();
    auto t1 = s.trainer(*first);
    t1->train_steps(7);
    io::save_checkpoint(path, *t1, 1, {{"note", "after round 1"}});

    auto second = s.host(77);  // a different initialisation: the checkpoint overwrites it
    auto t2 = s.trainer(*second, 999);
    io::SafetensorsMetadata meta;
    CHECK(io::load_checkpoint(path, *t2, &meta) == 1);
    CHECK(meta.at("note") == "after round 1");
    CHECK(bitwise_same(adapter_parameters(second->adapters()), adapter_parameters(first->adapters())));
    t2->train_steps(7);
    CHECK(bitwise_same(adapter_parameters(second->adapters()), adapter_parameters(full->adapters())));
    const auto sa = t2->state(), sb = t_full->state();
    CHECK(bitwise_same(sa.tensors, sb.tensors));
    CHECK(sa.train_rng == sb.train_rng);
    CHECK(sa.validation_rng == sb.validation_rng);

    // The file holds what the layout promises.
    const auto f = io::SafetensorsFile::load(path);
    CHECK(f.contains("param/layer0.mlp.router.weight"));
    CHECK(f.contains("optim/expert_optimizer.layer0.mlp.experts.1.proj.lora_B.exp_avg_sq"));
    CHECK(f.contains("optim/router_optimizer.layer0.mlp.router.weight.exp_avg"));
    CHECK(f.get<std::int64_t>("count/trainer.expert_steps", {})[0] == 7);
    CHECK(f.get<std::int64_t>("count/trainer.router_steps", {})[0] == 4);
    CHECK(f.metadata().at("comigs.dtype") == (std::is_same_v<T, float> ? "F32" : "F64"));
}

TEST_CASE("checkpoint: a crash in the middle of a save leaves the previous checkpoint loadable") {
    Setup<double> s;
    TempDir dir;
    const auto path = dir.path / "ckpt.safetensors";
    auto h = s.host();
    auto t = s.trainer(*h);
    t->train_steps(3);
    io::save_checkpoint(path, *t, 1);
    const auto saved_params = adapter_parameters(h->adapters());
    const auto saved_state = t->state();

    t->train_steps(4);
    const auto new_size = io::to_safetensors(io::make_checkpoint(*t, 2)).serialize().size();
    {
        io::testing::ScopedAtomicWriteFault fault({.crash_after_bytes = new_size / 2});
        CHECK_THROWS_AS(io::save_checkpoint(path, *t, 2), IoError);
    }
    CHECK(dir.entries() == std::vector<std::string>{"ckpt.safetensors"});

    auto h2 = s.host(8);
    auto t2 = s.trainer(*h2, 8);
    CHECK(io::load_checkpoint(path, *t2) == 1);
    CHECK(bitwise_same(adapter_parameters(h2->adapters()), saved_params));
    CHECK(bitwise_same(t2->state().tensors, saved_state.tensors));
    CHECK(t2->expert_steps() == 3);
}

TEST_CASE("checkpoint: corrupted, foreign or mismatched files are rejected and change nothing") {
    Setup<double> s;
    TempDir dir;
    const auto path = dir.path / "ckpt.safetensors";
    auto h = s.host();
    auto t = s.trainer(*h);
    t->train_steps(4);
    io::save_checkpoint(path, *t, 3);

    auto victim = s.host(9);
    auto tv = s.trainer(*victim, 9);
    tv->train_steps(2);
    const auto params = adapter_parameters(victim->adapters());
    const auto state = tv->state();
    auto unchanged = [&] {
        CHECK(bitwise_same(adapter_parameters(victim->adapters()), params));
        CHECK(bitwise_same(tv->state().tensors, state.tensors));
        CHECK(tv->expert_steps() == 2);
    };

    SUBCASE("a flipped bit in the data fails the checksum") {
        std::vector<char> bytes;
        {
            std::ifstream in(path, std::ios::binary);
            bytes.assign(std::istreambuf_iterator<char>(in), {});
        }
        bytes[bytes.size() - 20] ^= 0x10;
        {
            std::ofstream out(path, std::ios::binary | std::ios::trunc);
            out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
        }
        CHECK_THROWS_WITH_AS(io::load_checkpoint(path, *tv), doctest::Contains("checksum"), FormatError);
        unchanged();
    }
    SUBCASE("a model of another shape") {
        TinyHostConfig other;
        other.rank = 3;
        Setup<double> s3(other);
        auto h3 = s3.host();
        auto t3 = s3.trainer(*h3);
        CHECK_THROWS_AS(io::load_checkpoint(path, *t3), ShapeError);
        // and the victim still loads it fine afterwards
        CHECK(io::load_checkpoint(path, *tv) == 3);
        CHECK(bitwise_same(adapter_parameters(victim->adapters()), adapter_parameters(h->adapters())));
    }
    SUBCASE("a trainer with another configuration (no router optimiser)") {
        Setup<double> sj;
        sj.tcfg.router_training = RouterTraining::joint;
        auto hj = sj.host();
        auto tj = sj.trainer(*hj);
        const auto before = adapter_parameters(hj->adapters());
        CHECK_THROWS_AS(io::load_checkpoint(path, *tj), ShapeError);
        CHECK(bitwise_same(adapter_parameters(hj->adapters()), before));  // parameters restored after the failure
    }
    SUBCASE("another element type") {
        Setup<float> sf;
        auto hf = sf.host();
        auto tf = sf.trainer(*hf);
        CHECK_THROWS_WITH_AS(io::load_checkpoint(path, *tf), doctest::Contains("dtype F64"), FormatError);
    }
    SUBCASE("not a checkpoint") {
        io::SafetensorsFile f;
        f.add("w", {2}, std::vector<double>{1, 2});
        f.save(path);
        CHECK_THROWS_WITH_AS(io::load_checkpoint(path, *tv), doctest::Contains("not a comigs checkpoint"), FormatError);
        unchanged();
    }
    SUBCASE("reserved metadata keys") {
        CHECK_THROWS_AS(io::save_checkpoint(path, *tv, 1, {{"comigs.round", "1"}}), InvalidArgument);
    }
}
