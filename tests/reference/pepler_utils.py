# ruff: noqa
# fmt: off
# Vendored test reference; do not edit (only this header and the two imports' module paths
# were changed, and the functions unrelated to text metrics were left out).
# Source: github.com/lileipisces/PEPLER utils.py @ 912067e827ec8f50322240cfe59ad095b27f93a0
#   (Lei Li, "Personalized Prompt Learning for Explainable Recommendation", TOIS 2023). The
#   same metric functions appear in github.com/lileipisces/PETER utils.py (ACL 2021). The
#   repository carries no license file; this copy is used only as a test oracle.
#   `postprocessing` is "adopted from github.com/yoonkim/CNN_sentence process_data.py".
# main.py of PEPLER calls them as:
#   tokens = postprocessing(decoded_text).split() (cut at <eos>)
#   BLEU1 = bleu_score(tokens_test, tokens_predict, n_gram=1, smooth=False)
#   BLEU4 = bleu_score(tokens_test, tokens_predict, n_gram=4, smooth=False)
#   USR, USN = unique_sentence_percent(tokens_predict)
#   feature_batch = feature_detect(tokens_predict, feature_set)
#   DIV = feature_diversity(feature_batch); FCR = feature_coverage_ratio(feature_batch, feature_set)
#   FMR = feature_matching_ratio(feature_batch, test_data.feature)
#   ROUGE = rouge_score([' '.join(t) for t in tokens_test], [' '.join(t) for t in tokens_predict])
import re
from tests.reference.pepler_rouge import rouge
from tests.reference.pepler_bleu import compute_bleu


def rouge_score(references, generated):
    """both are a list of strings"""
    score = rouge(generated, references)
    rouge_s = {k: (v * 100) for (k, v) in score.items()}
    '''
    "rouge_1/f_score": rouge_1_f,
    "rouge_1/r_score": rouge_1_r,
    "rouge_1/p_score": rouge_1_p,
    "rouge_2/f_score": rouge_2_f,
    "rouge_2/r_score": rouge_2_r,
    "rouge_2/p_score": rouge_2_p,
    "rouge_l/f_score": rouge_l_f,
    "rouge_l/r_score": rouge_l_r,
    "rouge_l/p_score": rouge_l_p,
    '''
    return rouge_s


def bleu_score(references, generated, n_gram=4, smooth=False):
    """a list of lists of tokens"""
    formatted_ref = [[ref] for ref in references]
    bleu_s, _, _, _, _, _ = compute_bleu(formatted_ref, generated, n_gram, smooth)
    return bleu_s * 100


def two_seq_same(sa, sb):
    if len(sa) != len(sb):
        return False
    for (wa, wb) in zip(sa, sb):
        if wa != wb:
            return False
    return True


def unique_sentence_percent(sequence_batch):
    unique_seq = []
    for seq in sequence_batch:
        count = 0
        for uni_seq in unique_seq:
            if two_seq_same(seq, uni_seq):
                count += 1
                break
        if count == 0:
            unique_seq.append(seq)

    return len(unique_seq) / len(sequence_batch), len(unique_seq)


def feature_detect(seq_batch, feature_set):
    feature_batch = []
    for ids in seq_batch:
        feature_list = []
        for i in ids:
            if i in feature_set:
                feature_list.append(i)
        feature_batch.append(set(feature_list))

    return feature_batch


def feature_matching_ratio(feature_batch, test_feature):
    count = 0
    for (fea_set, fea) in zip(feature_batch, test_feature):
        if fea in fea_set:
            count += 1

    return count / len(feature_batch)


def feature_coverage_ratio(feature_batch, feature_set):
    features = set()
    for fb in feature_batch:
        features = features | fb

    return len(features) / len(feature_set)


def feature_diversity(feature_batch):
    list_len = len(feature_batch)

    total_count = 0
    for i, x in enumerate(feature_batch):
        for j in range(i + 1, list_len):
            y = feature_batch[j]
            total_count += len(x & y)

    denominator = list_len * (list_len - 1) / 2
    return total_count / denominator


def postprocessing(string):
    '''
    adopted from https://github.com/yoonkim/CNN_sentence/blob/master/process_data.py
    '''
    string = re.sub('\'s', ' \'s', string)
    string = re.sub('\'m', ' \'m', string)
    string = re.sub('\'ve', ' \'ve', string)
    string = re.sub('n\'t', ' n\'t', string)
    string = re.sub('\'re', ' \'re', string)
    string = re.sub('\'d', ' \'d', string)
    string = re.sub('\'ll', ' \'ll', string)
    string = re.sub('\(', ' ( ', string)
    string = re.sub('\)', ' ) ', string)
    string = re.sub(',+', ' , ', string)
    string = re.sub(':+', ' , ', string)
    string = re.sub(';+', ' . ', string)
    string = re.sub('\.+', ' . ', string)
    string = re.sub('!+', ' ! ', string)
    string = re.sub('\?+', ' ? ', string)
    string = re.sub(' +', ' ', string).strip()
    return string
